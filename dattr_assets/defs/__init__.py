"""One module per domain; `dattr_assets.definitions` assembles them."""
