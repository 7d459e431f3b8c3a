"""The `longlive` command line: one thin module per subcommand."""
