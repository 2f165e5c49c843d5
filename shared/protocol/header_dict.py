"""The fixed zstd dictionary of version-3 (compact) frame headers: part of the frame format."""

from __future__ import annotations

import zstandard

# Version-3 headers are zstd-compressed against this fixed raw-content dictionary: the skeleton
# of a typical update header (keys, codec, the tensor table of the built-in models), so a
# ~1.2 kB LeNet header costs ~200 bytes instead of ~420 with plain zstd. It is part of the
# frame format: never edit it (a different dictionary needs a new version byte).
HEADER_DICT_TEXT = (
    '{"kind":"update","federation":"demo","round":1,"client_id":"agent-0",'
    '"base_hash":"","codec":"topk1:0.02@warmup2","num_samples":1,"meta":{"train_loss":0.,'
    '"train_time_s":1.,"steps":1,"val_accuracy":0.,"val_loss":0.,"val_samples":1},'
    '"raw_len":1,"tensors":['
    '{"name":"1.weight","shape":[200,784],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"1.bias","shape":[200],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"3.weight","shape":[200,200],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"3.bias","shape":[200],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"5.weight","shape":[10,200],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"5.bias","shape":[10],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"0.weight","shape":[32,1,5,5],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"0.bias","shape":[32],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"3.weight","shape":[64,32,5,5],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"3.bias","shape":[64],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"7.weight","shape":[512,3136],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"7.bias","shape":[512],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"9.weight","shape":[10,512],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"9.bias","shape":[10],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"0.weight","shape":[6,1,5,5],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"0.bias","shape":[6],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"3.weight","shape":[16,6,5,5],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"3.bias","shape":[16],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"7.weight","shape":[120,400],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"7.bias","shape":[120],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"9.weight","shape":[84,120],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"9.bias","shape":[84],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"11.weight","shape":[10,84],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
    '{"name":"11.bias","shape":[10],"params":{"k":1,"rice":5,"ubits":1,"block":256}},'
)
HEADER_DICT = zstandard.ZstdCompressionDict(
    HEADER_DICT_TEXT.encode(), dict_type=zstandard.DICT_TYPE_RAWCONTENT
)
