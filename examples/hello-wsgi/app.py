"""The smallest WSGI app slipway can deploy: gunicorn app:app"""
import os


def app(environ, start_response):
    body = ("hello %s\n" % os.environ.get("GREETING", "world")).encode("utf-8")
    start_response(
        "200 OK",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]
