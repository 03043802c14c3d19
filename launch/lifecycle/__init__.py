"""The process lifecycle: rank environment, signals, exit codes and the launcher watch."""
