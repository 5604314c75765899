# A static bkpool binary (musl) in an empty image, running as a non-root user.
#   docker build -t bkpool/bkpool:0.1.0 .
FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev cmake make perl clang
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin bkpool \
 && strip target/release/bkpool

FROM scratch
COPY --from=build /src/target/release/bkpool /bkpool
USER 65532:65532
EXPOSE 1234 9090 9235
ENTRYPOINT ["/bkpool"]
