#!/bin/sh
# Run once by the postgres image on an empty data directory, after it created POSTGRES_DB
# (MLflow's database): one server, a second database for Prefect.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"$PREFECT_DB\" OWNER \"$POSTGRES_USER\";"
