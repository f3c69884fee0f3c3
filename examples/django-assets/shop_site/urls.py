from django.conf import settings
from django.urls import path, re_path
from django.views.static import serve

from shop import views

urlpatterns = [
    path("", views.index),
    path("upload/<str:name>", views.upload),
    path("hits", views.hits),
    # The app serves its own files here; slipway's proxy can serve them
    # instead with `[static] "/static/" = "staticfiles"`.
    re_path(r"^static/(?P<path>.*)$", serve, {"document_root": settings.STATIC_ROOT}),
    re_path(r"^media/(?P<path>.*)$", serve, {"document_root": settings.MEDIA_ROOT}),
]
