"""Secrets never leave the process: every message, stored error and log line goes through
:func:`redact`.

Two nets, both applied: patterns (URL userinfo passwords, query parameters and headers with
secret-looking names, ``Bearer``/``Basic`` credentials), and the exact values of every
credential this process has loaded (:func:`register_secret`), wherever they appear.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "***"
_SECRET_NAMES = (
    r"api[_-]?key|apikey|access[_-]?token|refresh[_-]?token|id[_-]?token|token|"
    r"client[_-]?secret|secret|password|passwd|pwd|signature|sig|x-amz-signature|"
    r"x-amz-security-token|x-amz-credential|auth|authorization|session[_-]?token|code|"
    # a bare "key" is a secret's name, a compound one only when it says so: primary_key,
    # sort_key or partition_key name columns, not secrets
    r"(?:secret|access|private|signing|master|encryption)[_-]?key|(?<![\w-])key"
)
# scheme://user:password@host -> scheme://user:***@host
_USERINFO = re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#]*:)[^\s@/]+(?=@)")
# name=value in a query string or a form body
_PARAM = re.compile(rf"(?P<pre>(?:^|[?&;\s,(\"'])(?:{_SECRET_NAMES})=)[^&\s;,\"')#]+",
                    re.IGNORECASE)
# name: value / "name": "value" / name=value in headers and JSON-ish text; a dotted location
# ending in such a name with a colon (``at tenants.0.credentials.crm.token: Field required``)
# says where a problem is, and the words after it are the problem, not a value
_FIELD = re.compile(rf"(?P<pre>(?:(?<!\.)[\"']?(?:{_SECRET_NAMES})[\"']?\s*[:=]"
                    rf"|(?<=\.)(?:{_SECRET_NAMES})\s*=)\s*[\"']?)"
                    r"(?!\*\*\*)[^\s\"',}&]+", re.IGNORECASE)
# a mapping key whose value is a secret whatever it looks like (log extras, documents)
_SECRET_KEY = re.compile(r"(?:.*[_\-])?(?:password|passwd|secret|token|api[_\-]?key|apikey|"
                         r"authorization|credentials?|(?:access|secret)[_\-]?key)",
                         re.IGNORECASE)
# the credential after an auth scheme (base64 may end in "="; ``token = x`` is a field)
_SCHEME_CRED = re.compile(r"(?P<pre>\b(?:Bearer|Basic|Token)\s+)[A-Za-z0-9._~+/\-]+=*",
                          re.IGNORECASE)

_known: set[str] = set()
_known_lock = threading.Lock()
_known_pattern: re.Pattern[str] | None = None
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words


_known_stale = False  # secrets registered since the pattern was built


def register_secret(*values: str | None) -> None:
    """Mask these exact values wherever they appear from now on (credentials, passwords).
    Cheap: the pattern is rebuilt once, by the next :func:`redact`, however many secrets
    were registered since (a pipeline of thousands of tenants registers each one)."""
    global _known_stale
    fresh = {v for v in values if v and len(v) >= MIN_SECRET_LENGTH and v not in _known}
    if not fresh:
        return
    with _known_lock:
        _known.update(fresh)
        _known_stale = True


def _pattern() -> re.Pattern[str] | None:
    global _known_pattern, _known_stale
    if _known_stale:
        with _known_lock:
            if _known_stale:
                _known_pattern = re.compile(trie_pattern(_known))
                _known_stale = False
    return _known_pattern


def trie_pattern(words: Iterable[str]) -> str:
    """A regular expression matching any of ``words``, the longest where several start at
    one place (no partial masks), built as a prefix tree: matching costs the length of the
    text, not the number of words times it (an alternation of thousands of secrets)."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here

    def render(node: dict[str, Any]) -> str:
        alternatives = []
        for ch, child in sorted((k, v) for k, v in node.items() if k):
            run = ch
            while len(child) == 1 and "" not in child:  # one way on: a literal run
                ((nxt, child),) = child.items()
                run += nxt
            alternatives.append(re.escape(run) + render(child))
        if not alternatives:
            return ""
        body = alternatives[0] if len(alternatives) == 1 else f"(?:{'|'.join(alternatives)})"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer word first

    return render(trie)


def register_url_secrets(urls: Iterable[str | None]) -> None:
    """The password in each URL's userinfo (state store, broker, base URL) and the values of
    its query parameters with secret-looking names become known secrets."""
    for url in urls:
        if not url:
            continue
        m = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#]*:([^\s@/]+)@", url)
        if m:
            register_secret(m.group(1), unquote(m.group(1)))
        query = urlsplit(url).query if "?" in url else ""
        for name, value in parse_qsl(query, keep_blank_values=False):
            if _SECRET_KEY.fullmatch(name) or re.fullmatch(_SECRET_NAMES, name, re.IGNORECASE):
                register_secret(value)


def redact(text: str) -> str:
    """``text`` with every secret it may carry masked."""
    if not text:
        return text
    pattern = _pattern()
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _USERINFO.sub(lambda m: m.group("pre") + MASK, text)
    text = _SCHEME_CRED.sub(lambda m: m.group("pre") + MASK, text)
    text = _PARAM.sub(lambda m: m.group("pre") + MASK, text)
    return _FIELD.sub(lambda m: m.group("pre") + MASK, text)


def redact_value(value: Any) -> Any:
    """Redact every string inside a JSON-compatible value (dicts, lists, strings); the value
    of a key named like a secret (``password``, ``client_secret``, ``api_key``...) is masked
    whole."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and v not in (None, "")
                and _SECRET_KEY.fullmatch(k) else redact_value(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value
