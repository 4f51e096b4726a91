"""WSGI entry point: ``gunicorn service.wsgi:app``. Settings come from ``FRACTURE_*`` variables."""

from service.app import create_app

app = create_app()
