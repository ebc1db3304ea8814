"""`trackpipe` subcommands beyond serving and sending, one module per area."""
