"""Command line: one small module per subcommand, each calling one library function."""
