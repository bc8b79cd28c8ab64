from visprune.cli import entry_point

entry_point()
