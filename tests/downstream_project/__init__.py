"""A stand-in for a user's own project that subclasses lit-methods (it is not part of the package)."""
