"""Library messages in the user's words: the option fields they name become the flags that set them.

The library names fields (`memory_gb`, `label_mapping`, `mask_source='none'`); each subcommand module may define
`PHRASES` (how its library names a field -> the flag) and `LEADING` (fields a message may start with), and
`maisi.cli.main` puts every error through `in_flags` with them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

NOT_AFTER_PATH = r"(?<![\w/\\.\-])"  # a phrase does not continue a name or a path
NOT_BEFORE_PATH = r"(?![\w/\\\-]|\.\w)"  # nor go on into one (a full stop ends a sentence; '.gz' goes on)


def in_flags(message: str, phrases: Mapping[str, str], leading: Sequence[str] = ()) -> str:
    """`message` with each phrase replaced by its flag in one pass (the longest phrase wins where two overlap, and
    a flag is never rewritten again), and a leading field flagged."""
    head = message.split(" ", 1)[0]
    if phrases:
        pattern = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
        # whole words only: a field name inside a path or file name (my_memory_gb_dir/, x.memory_gb.json) stays
        message = re.sub(rf"{NOT_AFTER_PATH}(?:{pattern}){NOT_BEFORE_PATH}", lambda m: phrases[m.group()], message)
    if head in leading and message.startswith(head):
        message = "--" + message
    return message
