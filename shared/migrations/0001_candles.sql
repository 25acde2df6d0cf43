-- Closed candles (klines), one row per (symbol, interval, open time), as the exchange reported them.
-- Times are Unix milliseconds (Binance's unit); prices and volumes are numeric without a type modifier, so
-- a value keeps the scale it was written with and reads back as the same decimal string.
CREATE TABLE candles (
    symbol                  text        NOT NULL,
    kline_interval          text        NOT NULL,
    open_time               bigint      NOT NULL,
    close_time              bigint      NOT NULL,
    open                    numeric     NOT NULL,
    high                    numeric     NOT NULL,
    low                     numeric     NOT NULL,
    close                   numeric     NOT NULL,
    volume                  numeric     NOT NULL,
    quote_volume            numeric     NOT NULL,
    trades                  bigint      NOT NULL,
    taker_buy_base_volume   numeric     NOT NULL,
    taker_buy_quote_volume  numeric     NOT NULL,
    written_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, kline_interval, open_time),
    CHECK (close_time > open_time),
    CHECK (trades >= 0)
);
