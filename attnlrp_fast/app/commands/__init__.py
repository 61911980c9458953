"""The `attnlrp-fast` commands, a module each: run(args) -> exit status, args as app/cli.py's parser built them.
cli.main imports a command's module only once its arguments parse, so each may import torch & co. at the top."""
