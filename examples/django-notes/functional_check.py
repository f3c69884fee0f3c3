"""Functional check run by `slipway promote` against the staging app.

slipway sets TARGET_URL (where the staging app answers) and TARGET_HOST
(its host name). The check adds a note through the real web stack and
reads it back; it exits non-zero on any failure, which stops promotion.
"""
import os
import sys
import urllib.parse
import urllib.request
import uuid

url = os.environ["TARGET_URL"].rstrip("/")
host = os.environ.get("TARGET_HOST", "")
marker = "functional-check-" + uuid.uuid4().hex[:8]


def request(path, data=None):
    req = urllib.request.Request(url + path, data=data, headers={"Host": host} if host else {})
    return urllib.request.urlopen(req, timeout=10).read().decode()


page = request("/")
if "slipway notes" not in page:
    sys.exit("the home page does not show the app")
request("/add", urllib.parse.urlencode({"text": marker}).encode())
if marker not in request("/"):
    sys.exit("a note added through the site did not appear")
print("functional check passed against", url)
