"""The coreg.v1 stubs generated from proto/ (see clients/python/generate.sh)."""
