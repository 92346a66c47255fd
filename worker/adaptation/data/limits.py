"""Decompression limits shared by every dataset reader (npz and image archives): an upload is refused
before its members are inflated when they would expand past these."""
MAX_ENTRIES = 1_000_000
MAX_TOTAL_BYTES = 64 << 30     # all members, uncompressed
MAX_ENTRY_BYTES = 1 << 30      # one member, uncompressed
MAX_RATIO = 200.0              # uncompressed / compressed, per member and in total ...
RATIO_MIN_BYTES = 1 << 20      # ... once a member (or the whole) is larger than this
