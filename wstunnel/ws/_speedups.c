/* Optional C masking for wstunnel (RFC 6455 5.3), built when a compiler is at hand.
 *
 * Why: masking is the per-byte cost of every upload (the agent masks, the relay
 * unmasks). The pure-Python route (four bytes.translate lane passes) moves
 * ~0.9 GB/s; an 8-byte XOR loop moves several GB/s. masking.py falls back to
 * the pure-Python route when this module is missing, with the same results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* out[i] = in[i] ^ key[i % 4]; out may be in. */
static void xor_key(unsigned char *out, const unsigned char *in, Py_ssize_t size,
                    const unsigned char *key)
{
    unsigned char doubled[8] = {key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]};
    uint64_t word_key, word;
    Py_ssize_t i = 0;

    memcpy(&word_key, doubled, 8);
    for (; i + 8 <= size; i += 8) {
        memcpy(&word, in + i, 8);
        word ^= word_key;
        memcpy(out + i, &word, 8);
    }
    for (; i < size; i++) {
        out[i] = in[i] ^ key[i & 3];
    }
}

static int get_key(Py_buffer *key)
{
    if (key->len != 4) {
        PyErr_SetString(PyExc_ValueError, "mask_key must be 4 bytes");
        return -1;
    }
    return 0;
}

/* mask_into(buffer, start, mask_key): XOR buffer[start:] in place. */
static PyObject *mask_into(PyObject *self, PyObject *args)
{
    Py_buffer buf, key;
    Py_ssize_t start;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "w*ny*", &buf, &start, &key)) {
        return NULL;
    }
    if (get_key(&key) == 0) {
        if (start < 0 || start > buf.len) {
            PyErr_SetString(PyExc_ValueError, "start is outside the buffer");
        } else {
            unsigned char *data = (unsigned char *)buf.buf + start;
            xor_key(data, data, buf.len - start, key.buf);
            result = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&key);
    return result;
}

/* masked(payload, mask_key) -> bytes: a masked copy. */
static PyObject *masked(PyObject *self, PyObject *args)
{
    Py_buffer payload, key;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "y*y*", &payload, &key)) {
        return NULL;
    }
    if (get_key(&key) == 0) {
        /* NULL: a fresh object (bytes of one given byte would be CPython's
         * shared single-byte object, which must never be written). */
        result = PyBytes_FromStringAndSize(NULL, payload.len);
        if (result != NULL && payload.len > 0) {
            xor_key((unsigned char *)PyBytes_AS_STRING(result), payload.buf, payload.len,
                    key.buf);
        }
    }
    PyBuffer_Release(&payload);
    PyBuffer_Release(&key);
    return result;
}

/* masked_frame(header, prefix, payload, mask_key) -> bytes: header, then
 * prefix + payload masked as one frame payload, in one allocation and one
 * pass (the multiplexer's record header is the prefix: no concatenation). */
static PyObject *masked_frame(PyObject *self, PyObject *args)
{
    Py_buffer header, prefix, payload, key;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "y*y*y*y*", &header, &prefix, &payload, &key)) {
        return NULL;
    }
    if (get_key(&key) == 0) {
        result = PyBytes_FromStringAndSize(NULL, header.len + prefix.len + payload.len);
        if (result != NULL) {
            const unsigned char *k = key.buf;
            Py_ssize_t shift = prefix.len & 3;
            unsigned char rotated[4] = {k[shift & 3], k[(shift + 1) & 3], k[(shift + 2) & 3],
                                        k[(shift + 3) & 3]};
            unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
            memcpy(out, header.buf, header.len);
            xor_key(out + header.len, prefix.buf, prefix.len, k);
            xor_key(out + header.len + prefix.len, payload.buf, payload.len, rotated);
        }
    }
    PyBuffer_Release(&header);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&payload);
    PyBuffer_Release(&key);
    return result;
}

/* uninitialized(size): a bytearray whose bytes are not zeroed first.
 * For receive buffers that a read fills at once: bytearray(size) would write
 * every byte twice. */
static PyObject *uninitialized(PyObject *self, PyObject *arg)
{
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, size);
}

static PyMethodDef methods[] = {
    {"mask_into", mask_into, METH_VARARGS, "XOR buffer[start:] with the repeated 4-byte key, in place."},
    {"masked", masked, METH_VARARGS, "A copy of payload XORed with the repeated 4-byte key."},
    {"masked_frame", masked_frame, METH_VARARGS, "header + masked (prefix + payload), in one pass."},
    {"uninitialized", uninitialized, METH_O, "A bytearray of size bytes, not zeroed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wstunnel.ws._speedups", NULL, -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
