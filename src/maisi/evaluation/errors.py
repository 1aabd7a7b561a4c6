"""OptionError: a bad option whose message names the option's field, so that a front end can show its own name."""

from __future__ import annotations

from collections.abc import Mapping


class OptionError(ValueError):
    """A bad option value. The message is written with `{field}` placeholders: str() shows the field names a
    Python caller uses (`reference_images`), `worded(names)` the names of another front end (`--reference-images`)."""

    def __init__(self, template: str, *fields: str):
        self.template, self.fields = template, fields
        super().__init__(self.worded({}))

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each field's placeholder replaced by names[field] (the field name when absent)."""
        message = self.template
        for f in self.fields:
            message = message.replace("{" + f + "}", names.get(f, f))
        return message
