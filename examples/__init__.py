"""Examples of apps that enqueue inferq jobs (not part of the installed package)."""
