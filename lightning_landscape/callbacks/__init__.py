"""Lightning callbacks of lightning-landscape (the thin glue over the pure-math modules)."""
