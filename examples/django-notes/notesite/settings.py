"""Settings for the slipway notes example.

Everything environment-specific comes from environment variables so the same
release directory (which slipway treats as read-only) can run anywhere:

  SECRET_KEY        Django secret key (a dev fallback is used if unset)
  DEBUG             "1"/"true"/"yes" to enable debug mode (default: off)
  ALLOWED_HOSTS     comma-separated host list (default: "*", any host)
  SLIPWAY_DATA_DIR  persistent writable per-app directory; the SQLite
                    database lives here so it survives new releases
"""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get(
    "SECRET_KEY", "dev-insecure-slipway-notes-change-me-in-production"
)

DEBUG = os.environ.get("DEBUG", "").strip().lower() in ("1", "true", "yes", "on")

# slipway's health checks and proxy send Host: APPNAME.localhost (or a custom
# domain), so accept any host unless explicitly restricted.
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("ALLOWED_HOSTS", "*").split(",") if h.strip()
]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "notes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "notesite.urls"
WSGI_APPLICATION = "notesite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    },
]

# The release directory is immutable: keep the database in the persistent
# per-app data directory provided by slipway.
DATA_DIR = os.environ.get("SLIPWAY_DATA_DIR", str(BASE_DIR))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(DATA_DIR, "db.sqlite3"),
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# No static files are served by this example (no collectstatic needed).

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"}},
    "root": {"handlers": ["stdout"], "level": "INFO"},
}
