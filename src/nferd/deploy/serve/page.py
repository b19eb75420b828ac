"""The operator page: one HTML file shipped in this package, with inline script and style, served
under a Content-Security-Policy that lets it fetch nothing but this server's own API."""

from importlib import resources


def page_html() -> str:
    """The operator page, a resource file of this package (inline script and style, nothing fetched)."""
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


PAGE_HEADERS = {
    # Everything is inline; nothing may be fetched from anywhere but this server (no CDN).
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
