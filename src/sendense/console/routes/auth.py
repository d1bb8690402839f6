"""Sign-in and sign-out."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from sendense.console import render, session
from sendense.console.page import CsrfRefused, Form, hub_of, key_of, read_form, same_origin

router = APIRouter()


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _safe_next(target: str | None) -> str:
    """Only a path inside the console (no scheme, no //host): no open redirect."""
    if target and target.startswith("/ui/") and not target.startswith("//"):
        return target
    return "/ui/"


@router.get("/signin")
def signin_form(request: Request, next: str | None = None) -> Response:
    nonce = secrets.token_urlsafe(18)
    response = render.page(
        request,
        None,
        "signin.html",
        csrf=session.csrf_for(key_of(request), "signin:" + nonce),
        next=_safe_next(next),
        message=None,
    )
    response.set_cookie(
        session.PRE_COOKIE,
        nonce,
        max_age=1800,
        path=session.COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await read_form(request)
    key = key_of(request)
    nonce = request.cookies.get(session.PRE_COOKIE) or ""
    if not same_origin(request) or not (
        nonce and session.csrf_ok(key, "signin:" + nonce, form.get("csrf"))
    ):
        raise CsrfRefused
    found = session.sign_in(hub_of(request), key, form.get("token", ""))
    if found is None:
        return render.page(
            request,
            None,
            "signin.html",
            status=401,
            csrf=form.get("csrf", ""),
            next=_safe_next(form.get("next")),
            message="That token is not valid (unknown, revoked or expired).",
        )
    cookie, opened = found
    request.state.principal = opened.who
    response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
    response.set_cookie(
        session.COOKIE,
        cookie,
        max_age=max(60, opened.expires - int(time.time())),
        path=session.COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(session.PRE_COOKIE, path=session.COOKIE_PATH)
    return response


@router.post("/signout")
def signout(request: Request, form: Form) -> Response:
    # Revoked in the catalog: a copy of the cookie stops working too.
    session.sign_out(hub_of(request), key_of(request), request.cookies.get(session.COOKIE))
    response = RedirectResponse("/ui/signin", status_code=303)
    response.delete_cookie(
        session.COOKIE,
        path=session.COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response
