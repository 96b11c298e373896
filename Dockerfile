# The optiscope collector image (the SDK's `optiscope` CLI plus the server).
#
#   docker build -t optiscope .
#   docker run -p 8737:8737 -e OPTISCOPE_TOKEN=... optiscope
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# constraints.txt pins the versions of the dependencies; the two local
# projects are installed together so that the server's dependency on the
# `optiscope` SDK resolves to ./sdk and not to a package index.
COPY constraints.txt ./
COPY sdk/ ./sdk/
COPY service/ ./service/
RUN pip install --no-cache-dir -c constraints.txt ./sdk ./service \
 && rm -rf /src

# Run as an unprivileged user; its home is the working directory, so a
# default local database file (when --db is not given) is writable.
RUN useradd --create-home --uid 10001 --user-group optiscope
USER optiscope
WORKDIR /home/optiscope

EXPOSE 8737

ENTRYPOINT ["optiscope"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8737"]
