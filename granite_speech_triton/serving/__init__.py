"""Triton glue: shared adapter helpers, repository rendering and the tritonserver launcher."""
