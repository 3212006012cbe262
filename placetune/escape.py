"""Strings from outside made safe for the text placetune generates: shell and Python comments, YAML scalars
and XML text (Python literals come from repr, which escapes the same characters).

A model file name, an -ot pattern, a study name or a CPU model string is data, never code. A newline in
a `#` comment ends the comment and turns the rest into a command, so every such string is passed through
one of these functions before it lands in a generated script, snippet or config. Command lines
themselves are built with shlex, which quotes control characters safely.
"""

from __future__ import annotations

import json

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """The text on one visible line: control characters, line and paragraph separators and invisible
    format characters (bidi overrides too) become escapes such as \\n, \\x1b or \\u2028."""
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif c in _NAMED:
            out.append(_NAMED[c])
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


def comment(text: str) -> str:
    """A `#` comment line for a shell script, a Python snippet or YAML: nothing after it can run."""
    return "# " + one_line(text)


def md_cell(text: str) -> str:
    """A markdown table cell: on one line, with its pipes escaped, so a name cannot end the cell or the row."""
    return one_line(text).replace("|", "\\|")


def yaml_string(text: str) -> str:
    """A double-quoted YAML scalar (JSON strings are valid YAML, with every control character escaped)."""
    return json.dumps(text, ensure_ascii=True)


def xml_text(text: str) -> str:
    """Text XML 1.0 can hold: characters it forbids (most control characters, lone surrogates) become escapes
    such as \\x1b; line breaks and tabs stay. ElementTree escapes markup but writes these raw, making the file
    unreadable to every JUnit consumer."""
    return "".join(c if c in "\t\n\r" or (c >= " " and not 0xD800 <= ord(c) <= 0xDFFF and c not in "\ufffe\uffff")
                   else one_line(c) if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text)
