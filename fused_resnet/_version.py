# The one place the version is written. pyproject.toml reads it statically (setuptools parses this file, it
# does not import the package) and fused_resnet/__init__.py re-exports it.
__version__ = "0.1.0"
