"""A package, so its package-scoped platform is torn down when its tests are done (in a plain
directory pytest keeps it until the session ends)."""
