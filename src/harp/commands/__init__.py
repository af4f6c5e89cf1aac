"""One module per `harp` sub-command, each a plain function; `harp.cli.commands()` lists and registers them."""
