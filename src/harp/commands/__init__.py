"""One module per `harp` sub-command; each registers itself on `harp.cli.app`."""
