# The distributed-mode workers (`ledger worker ingest`, `ledger worker project`) and the CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LEDGER_HOME=/var/lib/ledger

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY streams ./streams
COPY projections ./projections
COPY schemas ./schemas
# Editable: streams/ and projections/ are read from /app beside the installed package.
RUN pip install -e . \
    && useradd --system --home-dir /var/lib/ledger --create-home ledger
USER ledger
VOLUME ["/var/lib/ledger"]

# The workers stop cleanly on SIGTERM (compose's stop signal).
ENTRYPOINT ["ledger"]
CMD ["--help"]
