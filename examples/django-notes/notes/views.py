import os

from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .models import Note


@require_GET
def index(request):
    notes = Note.objects.all()
    return render(
        request,
        "notes/index.html",
        {
            "notes": notes[:50],
            "count": notes.count(),
            "app": os.environ.get("SLIPWAY_APP", "notes"),
            "release": os.environ.get("SLIPWAY_RELEASE", "dev"),
        },
    )


@csrf_exempt
@require_POST
def add(request):
    text = request.POST.get("text", "").strip()
    if text:
        Note.objects.create(text=text[:1000])
    return redirect("index")


def health(request):
    return HttpResponse("ok", content_type="text/plain")
