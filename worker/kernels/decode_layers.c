/* A step of decodes through every layer of a pre-norm decoder in one call (worker/decode_layers.py).
 *
 * At one stream on a CPU a decode step's arithmetic is a few hundred microseconds a layer, and the
 * Python around it (a norm, the attention, the activation and four linears, each a wrapper, a
 * ctypes or torch call and fresh tensors) was a quarter of the step. This runs the same calls in
 * the same order as worker/fused_layer.py's FusedLayer, with the same dtypes, so the logits are bit
 * for bit the same: the norms and the activation of worker/kernels/cpu_fused_ops.c and the attention
 * of worker/kernels/paged_decode_attention.c, by address, and each linear through torch's own
 * weight-only kernel, called by name through torch's C shim (libtorch's aoti_torch_* functions,
 * also by address): the arithmetic stays torch's.
 * Every linear takes and gives bfloat16 (as a weight-only kernel does), the norms give bfloat16
 * and the running sum of the residual stream stays float32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode_step.h"

#define ALIGNMENT 64

/* torch's C shim (torch/csrc/inductor/aoti_torch/c/shim.h): a tensor is an opaque handle, a
 * dispatcher stack slot 64 bits (a handle's address or an integer's bits). */
typedef int32_t torch_error;
typedef struct torch_tensor *tensor_handle;
typedef uint64_t stack_slot;

struct torch_shim {
    torch_error (*call_dispatcher)(const char *op, const char *overload, stack_slot *stack);
    torch_error (*from_blob)(void *data, int64_t ndim, const int64_t *sizes, const int64_t *strides,
                             int64_t storage_offset, int32_t dtype, int32_t device_type, int32_t device_index,
                             tensor_handle *out);
    torch_error (*new_handle)(tensor_handle tensor, tensor_handle *out);
    torch_error (*data_ptr)(tensor_handle tensor, void **out);
    torch_error (*delete_tensor)(tensor_handle tensor);
    int32_t bfloat16, cpu;
};

typedef void (*rms_norm_fn)(const void *x, int64_t x_bf16, const float *residual, const float *weight, void *out,
                            int64_t out_bf16, float *total, int64_t rows, int64_t width, int64_t x_stride,
                            int64_t residual_stride, int64_t out_stride, float eps, int64_t mode);
typedef void (*silu_and_mul_fn)(const void *x, int64_t x_bf16, void *out, int64_t out_bf16, int64_t rows,
                                int64_t width, int64_t x_stride);

/* One weight-only linear: torch's op (aten::_weight_int4pack_mm_for_cpu, with its group size, or
 * aten::_weight_int8pack_mm, group_size 0) and its tensors. */
struct linear {
    const char *op;
    tensor_handle weight, scales;
    int64_t group_size, in_features, out_features;
};

struct layer {
    struct linear qkv, o_proj, gate_up, down;
    const float *attn_norm, *mlp_norm;
    float attn_eps, mlp_eps;
    int64_t norm_mode;
    const struct decode_layer *attention;
    float *key_cache, *value_cache;
    int64_t rotation; /* which of the step's RoPE tables */
};

struct rotation {
    const float *cos, *sin;
    int64_t rotary_dim, table_stride;
};

struct decoder {
    struct torch_shim torch;
    rms_norm_fn rms_norm;
    silu_and_mul_fn silu_and_mul;
    decode_layer_attention_fn attend;
    const struct layer *layers;
    int64_t num_layers, hidden_size;
};

/* x [rows, in_features] bfloat16 through torch's kernel: a new tensor (out), its data at *data. */
static int run_linear(const struct torch_shim *torch, const struct linear *linear, void *x, int64_t rows,
                      tensor_handle *out, void **data) {
    const int64_t sizes[2] = {rows, linear->in_features}, strides[2] = {linear->in_features, 1};
    tensor_handle input, weight, scales;
    if (torch->from_blob(x, 2, sizes, strides, 0, torch->bfloat16, torch->cpu, 0, &input)) return 2;
    if (torch->new_handle(linear->weight, &weight)) {
        torch->delete_tensor(input);
        return 2;
    }
    if (torch->new_handle(linear->scales, &scales)) {
        torch->delete_tensor(input);
        torch->delete_tensor(weight);
        return 2;
    }
    /* the dispatcher takes over the handles on the stack and leaves the result's in stack[0] */
    stack_slot stack[4] = {(stack_slot)(uintptr_t)input, (stack_slot)(uintptr_t)weight};
    if (linear->group_size > 0) {
        stack[2] = (stack_slot)linear->group_size;
        stack[3] = (stack_slot)(uintptr_t)scales;
    } else {
        stack[2] = (stack_slot)(uintptr_t)scales;
    }
    /* a call that fails before it takes the handles over (an op this torch lacks) leaks them, once:
     * the step raises */
    if (torch->call_dispatcher(linear->op, "", stack)) return 2;
    *out = (tensor_handle)(uintptr_t)stack[0];
    if (torch->data_ptr(*out, data)) {
        torch->delete_tensor(*out);
        *out = NULL;
        return 2;
    }
    return 0;
}

/* Memory at torch's alignment: its int8 kernel reads its input with aligned vector loads. */
static void *aligned(size_t bytes) {
    return aligned_alloc(ALIGNMENT, (bytes + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT);
}

static void release(const struct torch_shim *torch, tensor_handle *tensor) {
    if (*tensor != NULL) torch->delete_tensor(*tensor);
    *tensor = NULL;
}

/* Every layer for a step of decodes: embedded [rows, hidden] float32 in; the last layer's output
 * (bfloat16, into out_hidden) and the residual stream before it (float32, into out_residual), as
 * FusedLayer hands them to the final norm. 0, or 1 where memory ran out, 2 where a torch call
 * failed (torch printed why). */
int decode_layers(const struct decoder *decoder, const struct decode_step *step, const struct rotation *rotations,
                  const float *embedded, uint16_t *out_hidden, float *out_residual) {
    const struct torch_shim *torch = &decoder->torch;
    const int64_t rows = step->num_seqs, width = decoder->hidden_size;
    int64_t widest = width; /* the widest input of a linear: the scratch of normed and activated rows */
    for (int64_t i = 0; i < decoder->num_layers; ++i) {
        const struct layer *layer = &decoder->layers[i];
        if (layer->down.in_features > widest) widest = layer->down.in_features;
        if (layer->o_proj.in_features > widest) widest = layer->o_proj.in_features;
    }
    /* the residual stream: after a layer's first norm in `attended`, after its second in `layered`
     * (a norm never writes the sum it reads) */
    float *attended = aligned(sizeof(float) * (size_t)(2 * rows * width)), *layered = attended + rows * width;
    uint16_t *scratch = aligned(sizeof(uint16_t) * (size_t)(rows * widest));
    if (attended == NULL || scratch == NULL) {
        free(attended);
        free(scratch);
        return 1;
    }
    const void *x = embedded; /* the sublayer output the next norm adds in */
    int64_t x_bf16 = 0;
    const float *residual = NULL; /* the stream before x: none before the first layer */
    tensor_handle held = NULL;    /* the tensor x lives in, once a linear made it */
    int status = 0;
    for (int64_t i = 0; i < decoder->num_layers; ++i) {
        const struct layer *layer = &decoder->layers[i];
        const struct rotation *rotation = &rotations[layer->rotation];
        tensor_handle made = NULL;
        void *data;
        decoder->rms_norm(x, x_bf16, residual, layer->attn_norm, scratch, 1, attended, rows, width, width,
                          width, width, layer->attn_eps, layer->norm_mode);
        /* without a residual, a float32 input is the stream itself (the norm writes no sum) */
        const float *stream = residual == NULL && !x_bf16 ? (const float *)x : attended;
        release(torch, &held);
        if ((status = run_linear(torch, &layer->qkv, scratch, rows, &made, &data))) break;
        status = decoder->attend(step, layer->attention, data, layer->qkv.out_features, rotation->cos,
                                 rotation->sin, rotation->rotary_dim, rotation->table_stride, layer->key_cache,
                                 layer->value_cache, scratch);
        release(torch, &made);
        if (status) break;
        if ((status = run_linear(torch, &layer->o_proj, scratch, rows, &made, &data))) break;
        decoder->rms_norm(data, 1, stream, layer->mlp_norm, scratch, 1, layered, rows, width, width, width, width,
                          layer->mlp_eps, layer->norm_mode);
        release(torch, &made);
        if ((status = run_linear(torch, &layer->gate_up, scratch, rows, &made, &data))) break;
        const int64_t inner = layer->down.in_features;
        decoder->silu_and_mul(data, 1, scratch, 1, rows, inner, 2 * inner);
        release(torch, &made);
        if ((status = run_linear(torch, &layer->down, scratch, rows, &held, &data))) break;
        x = data;
        x_bf16 = 1;
        residual = layered;
    }
    if (status == 0) {
        memcpy(out_hidden, x, sizeof(uint16_t) * (size_t)(rows * width));
        memcpy(out_residual, residual, sizeof(float) * (size_t)(rows * width));
    }
    release(torch, &held);
    free(attended);
    free(scratch);
    return status;
}
