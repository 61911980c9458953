"""The long-document application: the `attnlrp-fast` command (cli), the job it runs on a causal LM (longdoc), the
offline MiniLM demo (demo) and the reports both write (report). It sits on top of the core (af.explain, the model
maps, the bindings) and nothing below it imports it."""
