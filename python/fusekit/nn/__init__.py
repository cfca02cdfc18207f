"""Drop-in modules built on fusekit's ops."""
