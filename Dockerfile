# FractureNode: web portal + REST API, DICOM listener and a worker in one container.
# Research use only. Not for diagnostic use.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FRACTURE_DATA_DIR=/data FRACTURE_HTTP_HOST=0.0.0.0 FRACTURE_DICOM_HOST=0.0.0.0

RUN useradd --system --create-home --uid 10001 fracture
WORKDIR /app

# The CPU build of PyTorch first, so the project's torch==2.13.0 pin is already satisfied and no CUDA
# packages are pulled in.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY config ./config
COPY service ./service
COPY dicom ./dicom
COPY pipeline ./pipeline
COPY migrations ./migrations
RUN pip install . && mkdir -p /data && chown fracture:fracture /data

USER fracture
VOLUME ["/data"]
EXPOSE 8000 11112
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

# `run` migrates the database, then supervises gunicorn, the DICOM listener and FRACTURE_WORKERS workers.
CMD ["fracture-node", "run"]
