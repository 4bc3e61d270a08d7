"""Where models come from and how HF-format folders are read: locations, hub reachability, the embedded tiny models, shared HF helpers."""
