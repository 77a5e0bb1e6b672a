"""s2d: sorted speculative decoding for several targets of one family from one shared draft."""
