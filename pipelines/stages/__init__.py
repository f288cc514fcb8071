"""Stage kinds: each module defines one `Stage` subclass and its `model:` config dataclass."""
