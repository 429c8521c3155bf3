"""The onboarding pages: plain, accessible HTML with one inline stylesheet and no script.

The stylesheet is allowed by its hash in the Content-Security-Policy, so the policy needs
no 'unsafe-inline'. Everything shown is escaped; nothing shown is a secret.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape

STYLE = (
    "body{font-family:system-ui,sans-serif;line-height:1.5;max-width:36rem;"
    "margin:3rem auto;padding:0 1rem;color:#1a1a1a;background:#fff}"
    ".button{display:inline-block;font-size:1rem;padding:.6rem 1.4rem;border-radius:.4rem;"
    "background:#0b57d0;color:#fff;text-decoration:none}"
    ".button:focus-visible{outline:3px solid #1a1a1a;outline-offset:2px}"
    "code{font-size:1.05rem}"
)
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
SITE = "loop-sync"


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · {SITE}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def home_page() -> str:
    return _page(
        "Connect your Loop account",
        "<h1>Connect your Loop account</h1>"
        "<p>loop-sync keeps a copy of your Loop lab results up to date. Loop will ask you "
        "to confirm what it may read; you can disconnect at any time.</p>"
        '<p><a class="button" href="/login">Connect your Loop account</a></p>',
    )


def success_page(user_id: str) -> str:
    return _page(
        "Your Loop account is connected",
        "<h1>Your Loop account is connected</h1>"
        f'<p role="status">Loop user <code>{escape(user_id)}</code> is now connected. '
        "loop-sync will keep a copy of your lab results up to date.</p>"
        "<p>You can close this window.</p>",
    )


def error_page(title: str, message: str, *, retry: bool = True) -> str:
    """`retry` offers a new consent flow; otherwise the way back is the start page."""
    action = (
        '<a class="button" href="/login">Try again</a>'
        if retry
        else '<a href="/">Go to the start page</a>'
    )
    return _page(
        title, f'<h1>{escape(title)}</h1><p role="alert">{escape(message)}</p><p>{action}</p>'
    )
