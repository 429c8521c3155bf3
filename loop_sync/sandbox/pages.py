"""The sandbox's HTML: Loop's hosted consent screen and its error page."""

from __future__ import annotations

from html import escape

from loop_sync.sandbox.authority import AuthorizationRequest

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem}"
    "button{font-size:1rem;padding:.5rem 1.25rem;margin-right:.5rem}"
    "fieldset{margin:1rem 0}"
)


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · Loop sandbox</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def consent_page(request_id: str, request: AuthorizationRequest) -> str:
    user = (
        f"<p>Signed in as <strong>{escape(request.login_hint)}</strong>.</p>"
        f'<input type="hidden" name="user" value="{escape(request.login_hint)}">'
        if request.login_hint
        else '<p><label for="user">Sandbox user</label> '
        '<input id="user" name="user" value="usr_0001" required></p>'
    )
    scopes = "".join(
        f'<div><input type="checkbox" id="scope-{i}" name="scope" value="{escape(s)}" checked>'
        f' <label for="scope-{i}">{escape(s)}</label></div>'
        for i, s in enumerate(request.scopes)
    )
    body = (
        "<h1>Connect with Loop</h1>"
        f"<p><strong>{escape(request.client_id)}</strong> asks to access your Loop account.</p>"
        '<form method="post" action="/v1/oauth/authorize">'
        f'<input type="hidden" name="request_id" value="{escape(request_id)}">{user}'
        f"<fieldset><legend>It will be able to</legend>{scopes}</fieldset>"
        '<button type="submit" name="decision" value="allow">Allow</button>'
        '<button type="submit" name="decision" value="deny">Deny</button>'
        "</form>"
    )
    return _page("Connect with Loop", body)


def error_page(message: str) -> str:
    body = f'<h1>Something is wrong with this request</h1><p role="alert">{escape(message)}</p>'
    return _page("Error", body)
