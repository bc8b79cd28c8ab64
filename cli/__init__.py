"""The `visprune` command line, the top of the house: each subcommand parses its flags and calls one library
function of a stage below it. Nothing imports this package."""
