import os

from django.core.management.utils import get_random_secret_key

from .base import *

DEBUG = False


# Deployment: configuration comes from the environment (`slipway config set`).
def _secret_key():
    """SECRET_KEY from the environment; failing that, a key generated once and
    kept in the app's data directory, so sessions survive releases."""
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    path = DATA_DIR / "secret_key"
    if not path.exists():
        # Write aside, then link into place: a concurrent process either
        # wins the link or reads the winner's complete key.
        tmp = DATA_DIR / f".secret_key.{os.getpid()}"
        tmp.write_text(get_random_secret_key())
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


SECRET_KEY = _secret_key()

ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "*").split(",") if h.strip()]

# Errors (500s with their tracebacks) to stderr, which slipway keeps as the
# app's log; with DEBUG off Django would otherwise only email them.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}

# ManifestStaticFilesStorage is recommended in production, to prevent
# outdated JavaScript / CSS assets being served from cache
# (e.g. after a Wagtail upgrade).
# See https://docs.djangoproject.com/en/5.2/ref/contrib/staticfiles/#manifeststaticfilesstorage
STORAGES["staticfiles"]["BACKEND"] = "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"

try:
    from .local import *
except ImportError:
    pass
