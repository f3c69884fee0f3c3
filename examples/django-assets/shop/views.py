import os

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, HttpResponseBadRequest
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt


def index(request):
    return render(request, "index.html", {"release": os.environ.get("SLIPWAY_RELEASE", "")})


@csrf_exempt
def upload(request, name):
    """POST a file body: stored under MEDIA_ROOT (persistent [storage])."""
    if request.method != "POST" or name.startswith("."):
        return HttpResponseBadRequest("POST a file under a plain name\n")
    with open(os.path.join(settings.MEDIA_ROOT, name), "wb") as f:
        f.write(request.body)
    return HttpResponse("stored %s\n" % name)


def hits(request):
    """Counts visits in the SQLite database (persistent [storage], WAL)."""
    with connection.cursor() as c:
        c.execute("CREATE TABLE IF NOT EXISTS hits (at TEXT)")
        c.execute("INSERT INTO hits VALUES (datetime('now'))")
        c.execute("SELECT count(*) FROM hits")
        n = c.fetchone()[0]
    return HttpResponse("hits: %d\n" % n)
