"""The command line: `commands` parses and asks, `render` draws (and the demo draws with it too)."""
