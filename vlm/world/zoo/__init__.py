"""The offline model zoo: the catalogue and `zoo:<name>` resolution, pinned downloads, converters."""
