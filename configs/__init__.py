"""ml-collections config files for `qponder --config=configs/<name>.py[:variant]`."""
