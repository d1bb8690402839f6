"""What every console route gets: the hub, the signed-in caller, CSRF checks.

``Signed`` is the dependency of every page behind sign-in; ``Form`` reads a
POSTed form (urlencoded; no multipart needed) after checking its CSRF token
and origin. Role checks are explicit (`Page.require`): the console calls the
services directly, below the API's role dependencies.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, ValidationError

from sendense.console import render, session
from sendense.console.session import ConsoleSession
from sendense.core.access import Principal, Role
from sendense.core.errors import Forbidden, InvalidRequest
from sendense.web.errors import validation_message

M = TypeVar("M", bound=BaseModel)


class SignInNeeded(Exception):
    pass


class CsrfRefused(Exception):
    pass


def hub_of(request: Request) -> Any:
    return request.app.state.parent.state.hub


def key_of(request: Request) -> bytes:
    """The signing key, derived once per process from the hub's secret.key."""
    app_state = request.app.state
    key = getattr(app_state, "session_key", None)
    if key is None:
        st = hub_of(request)
        key = session.derive_key(st.settings.data_dir / "secret.key")
        app_state.session_key = key
    return key


@dataclass
class Page:
    request: Request
    st: Any
    key: bytes
    session: ConsoleSession

    @property
    def who(self) -> Principal:
        return self.session.who

    @cached_property
    def csrf(self) -> str:
        return session.csrf_for(self.key, self.session.sid)

    def can(self, role: str) -> bool:
        return self.who.role.allows(Role(role))

    def require(self, role: str) -> None:
        needed = Role(role)
        if not self.who.role.allows(needed):
            raise Forbidden(
                f"this needs the {needed.value} role; token {self.who.name} has"
                f" {self.who.role.value}",
                role_needed=needed.value,
            )

    def still_valid(self) -> bool:
        """Whether this page's session would still be accepted (token not
        revoked or expired): for long-lived answers such as event streams."""
        cookie = self.request.cookies.get(session.COOKIE)
        return session.resume(self.st, self.key, cookie) is not None

    def done(self, path: str, message: str) -> RedirectResponse:
        """After a form: back to a page (303, so a reload does not send it
        again), with a notice. The notice is signed for this session: a link
        from elsewhere cannot make the console say something."""
        sep = "&" if "?" in path else "?"
        query = urlencode({"done": message, "n": self._notice_mac(message)})
        return RedirectResponse(f"{path}{sep}{query}", status_code=303)

    @property
    def notice(self) -> str | None:
        """The signed notice of the page's URL, if any."""
        message = self.request.query_params.get("done")
        given = self.request.query_params.get("n", "")
        if not message or not hmac.compare_digest(given, self._notice_mac(message)):
            return None
        return message

    def _notice_mac(self, message: str) -> str:
        data = f"notice:{self.session.sid}:{message}".encode()
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()[:32]

    def render(self, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        return render.page(self.request, self, template, status=status, **context)


def signed_in(request: Request) -> Page:
    st = hub_of(request)
    key = key_of(request)
    found = session.resume(st, key, request.cookies.get(session.COOKIE))
    if found is None:
        raise SignInNeeded
    request.state.principal = found.who  # for the audit log
    return Page(request, st, key, found)


Signed = Annotated[Page, Depends(signed_in)]


def same_origin(request: Request) -> bool:
    """A browser names the page's origin on a POST; it must be this hub."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        # Referrer-Policy no-referrer makes browsers send "Origin: null" on a
        # form POST (Fetch standard, "serializing a request origin"); without
        # a usable origin the CSRF token alone decides.
        return True
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


async def read_form(request: Request) -> dict[str, str]:
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the form is not UTF-8") from None
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


async def checked_form(request: Request, page: Signed) -> dict[str, str]:
    form = await read_form(request)
    if not same_origin(request) or not session.csrf_ok(
        page.key, page.session.sid, form.get("csrf")
    ):
        raise CsrfRefused
    return form


Form = Annotated[dict[str, str], Depends(checked_form)]


def field_int(form: dict[str, str], name: str, default: int | None = None) -> int | None:
    value = form.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a whole number", field=name) from None


def build(model: type[M], **data: Any) -> M:
    """A request schema of the API from form fields: its validation errors as
    the API's 400 (the field named)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidRequest(validation_message(e.errors())) from None  # type: ignore[arg-type]
