"""The long-document application: the `attnlrp-fast` command (cli: the parser; commands/: a module per command;
common: what they share), the jobs it runs on a causal LM (longdoc) and on a vision-language model (vlm), the offline
MiniLM demo (demo) and the reports they write (report). It sits on top of the core (af.explain, the model maps, the
bindings) and nothing below it imports it."""
