/*
 * TokenGather TensorRT plugin (IPluginV3). See tokenGatherPlugin.h and README.md.
 *
 * Registration: exactly one of two routes per library, chosen at compile time, so the creator is never
 * registered twice (TensorRT rejects, or warns about, a duplicate name/version/namespace):
 *   TOKEN_GATHER_DYNAMIC_REGISTRATION == 0 (default): REGISTER_TENSORRT_PLUGIN registers the creator when the
 *     library is loaded (ctypes.CDLL, trtexec --staticPlugins, dlopen). Logs go to TensorRT's global logger.
 *   TOKEN_GATHER_DYNAMIC_REGISTRATION == 1: the library exports getCreators and setLoggerFinder, which
 *     IPluginRegistry::loadLibrary and trtexec --dynamicPlugins call; nothing registers on load.
 */
#include "tokenGatherPlugin.h"

#include "tokenGatherKernel.h"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#ifndef TOKEN_GATHER_DYNAMIC_REGISTRATION
#define TOKEN_GATHER_DYNAMIC_REGISTRATION 0
#endif

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ILogger;
using nvinfer1::IPluginV3;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

namespace token_gather
{
namespace
{

constexpr int32_t kNB_INPUTS = 2;
constexpr int32_t kIN_TOKENS = 0;
constexpr int32_t kIN_SCORES = 1;

#if TOKEN_GATHER_DYNAMIC_REGISTRATION
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

ILogger* currentLogger() noexcept
{
    try
    {
        // Asked on every message: the application may swap its logger between builds.
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        return finder != nullptr ? finder->findLogger() : nullptr;
    }
    catch (...)
    {
        return nullptr;
    }
}
#else
ILogger* currentLogger() noexcept
{
    return getLogger(); // libnvinfer's global logger; this library links libnvinfer for the registry anyway
}
#endif

void logMessage(ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::string const text = std::string{kPLUGIN_NAME} + " plugin: " + message;
        if (ILogger* logger = currentLogger())
        {
            logger->log(severity, text.c_str());
        }
        else
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
        // Logging must never throw across the TensorRT interface.
    }
}

void logError(std::string const& message) noexcept
{
    logMessage(ILogger::Severity::kERROR, message);
}

bool isTokenType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

ElementType toElementType(DataType type)
{
    return type == DataType::kHALF ? ElementType::kFLOAT16 : ElementType::kFLOAT32;
}

// Reads one integer attribute; the ONNX parser passes ONNX INT as kINT32, Python callers may pass int64.
bool readIntField(PluginField const& field, int32_t& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    if (field.type == PluginFieldType::kINT32)
    {
        value = *static_cast<int32_t const*>(field.data);
        return true;
    }
    if (field.type == PluginFieldType::kINT64)
    {
        int64_t const wide = *static_cast<int64_t const*>(field.data);
        if (wide < INT32_MIN || wide > INT32_MAX)
        {
            return false;
        }
        value = static_cast<int32_t>(wide);
        return true;
    }
    return false;
}

} // namespace

// ---------------------------------------------------------------------------------------------------------------
// TokenGatherPlugin

TokenGatherPlugin::TokenGatherPlugin(int32_t keep, bool withIndices) noexcept
    : mKeep(keep)
    , mWithIndices(withIndices ? 1 : 0)
{
}

TokenGatherPlugin::TokenGatherPlugin(TokenGatherPlugin const& other) noexcept
    : nvinfer1::IPluginV3(other)
    , nvinfer1::IPluginV3OneCore(other)
    , nvinfer1::IPluginV3OneBuild(other)
    , nvinfer1::IPluginV3OneRuntime(other)
    , mKeep(other.mKeep)
    , mWithIndices(other.mWithIndices)
{
    // mSerializedFields is rebuilt on demand: copying it would point into other's members.
}

nvinfer1::IPluginCapability* TokenGatherPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* TokenGatherPlugin::clone() noexcept
{
    try
    {
        return new TokenGatherPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string{"clone failed: "} + e.what());
    }
    return nullptr;
}

char const* TokenGatherPlugin::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* TokenGatherPlugin::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* TokenGatherPlugin::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

int32_t TokenGatherPlugin::getNbOutputs() const noexcept
{
    return 1 + mWithIndices;
}

int32_t TokenGatherPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != getNbOutputs())
    {
        logError("expects 2 inputs and " + std::to_string(getNbOutputs()) + " output(s), got "
            + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
        return -1;
    }
    outputTypes[0] = inputTypes[kIN_TOKENS];
    if (mWithIndices)
    {
        outputTypes[1] = DataType::kINT32;
    }
    return 0;
}

int32_t TokenGatherPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != getNbOutputs() || inputs[kIN_TOKENS].nbDims != 3
        || inputs[kIN_SCORES].nbDims != 2)
    {
        logError("expects tokens [B, N, C] and scores [B, N-1]");
        return -1;
    }
    DimsExprs const& tokens = inputs[kIN_TOKENS];
    outputs[0].nbDims = 3;
    outputs[0].d[0] = tokens.d[0];
    outputs[0].d[1] = exprBuilder.constant(static_cast<int64_t>(mKeep) + 1);
    outputs[0].d[2] = tokens.d[2];
    if (mWithIndices)
    {
        outputs[1].nbDims = 2;
        outputs[1].d[0] = tokens.d[0];
        outputs[1].d[1] = exprBuilder.constant(mKeep);
    }
    return 0;
}

bool TokenGatherPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != getNbOutputs() || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isTokenType(desc.type);                     // tokens
    case 1: return isTokenType(desc.type);                     // scores, independent of tokens
    case 2: return desc.type == inOut[kIN_TOKENS].desc.type;   // kept tokens
    case 3: return desc.type == DataType::kINT32;              // kept patch indices
    default: return false;
    }
}

int32_t TokenGatherPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
    int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != getNbOutputs())
    {
        logError("configurePlugin: wrong number of inputs or outputs");
        return -1;
    }
    nvinfer1::Dims const& tokensMin = in[kIN_TOKENS].min;
    nvinfer1::Dims const& tokensDims = in[kIN_TOKENS].desc.dims;
    nvinfer1::Dims const& scoresDims = in[kIN_SCORES].desc.dims;
    if (tokensDims.nbDims != 3 || scoresDims.nbDims != 2)
    {
        logError("configurePlugin: expects tokens [B, N, C] and scores [B, N-1]");
        return -1;
    }
    // The smallest N the profile allows decides whether K fits (N is static for ViTs, so min == N).
    int64_t const smallestN = tokensDims.d[1] >= 0 ? tokensDims.d[1] : tokensMin.d[1];
    if (smallestN >= 0 && (mKeep < 1 || mKeep > smallestN - 1))
    {
        logError("K = " + std::to_string(mKeep) + " must lie in [1, N - 1] with N = " + std::to_string(smallestN));
        return -1;
    }
    if (tokensDims.d[1] >= 0 && scoresDims.d[1] >= 0 && scoresDims.d[1] != tokensDims.d[1] - 1)
    {
        logError("scores must have N - 1 = " + std::to_string(tokensDims.d[1] - 1) + " columns, got "
            + std::to_string(scoresDims.d[1]));
        return -1;
    }
    if (tokensDims.d[1] >= 0 && tokenGatherSharedBytes(static_cast<int32_t>(tokensDims.d[1]), mKeep)
            > kTokenGatherMaxSharedBytes)
    {
        logError("N - 1 + K must be at most 12288 (shared memory of one block)");
        return -1;
    }
    return 0;
}

int32_t TokenGatherPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNB_INPUTS || nbOutputs != getNbOutputs() || in[kIN_TOKENS].dims.nbDims != 3
        || in[kIN_SCORES].dims.nbDims != 2)
    {
        logError("onShapeChange: expects tokens [B, N, C] and scores [B, N-1]");
        return -1;
    }
    int64_t const numTokens = in[kIN_TOKENS].dims.d[1];
    if (in[kIN_SCORES].dims.d[1] != numTokens - 1 || mKeep > numTokens - 1)
    {
        logError("onShapeChange: need scores [B, N-1] and K <= N - 1, got N = " + std::to_string(numTokens));
        return -1;
    }
    return 0;
}

int32_t TokenGatherPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvinfer1::Dims const& dims = inputDesc[kIN_TOKENS].dims;
    if (dims.d[0] > INT32_MAX || dims.d[1] > INT32_MAX || dims.d[2] > INT32_MAX)
    {
        logError("enqueue: a dimension exceeds int32");
        return -1;
    }
    TokenGatherParams params;
    params.tokens = inputs[kIN_TOKENS];
    params.scores = inputs[kIN_SCORES];
    params.output = outputs[0];
    params.indices = mWithIndices ? static_cast<int32_t*>(outputs[1]) : nullptr;
    params.tokenType = toElementType(inputDesc[kIN_TOKENS].type);
    params.scoreType = toElementType(inputDesc[kIN_SCORES].type);
    params.batch = static_cast<int32_t>(dims.d[0]);
    params.numTokens = static_cast<int32_t>(dims.d[1]);
    params.channels = static_cast<int32_t>(dims.d[2]);
    params.keep = mKeep;
    if (char const* reason = tokenGatherInvalidReason(params))
    {
        logError(std::string{"enqueue: "} + reason);
        return -1;
    }
    cudaError_t const status = launchTokenGather(params, stream);
    if (status != cudaSuccess)
    {
        logError(std::string{"kernel launch failed: "} + cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

IPluginV3* TokenGatherPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources: an independent copy is all an execution context needs
}

PluginFieldCollection const* TokenGatherPlugin::getFieldsToSerialize() noexcept
{
    // Point at members so the fields stay valid for the plugin's lifetime, as TensorRT requires.
    mSerializedFields[0] = PluginField(kFIELD_KEEP, &mKeep, PluginFieldType::kINT32, 1);
    mSerializedFields[1] = PluginField(kFIELD_WITH_INDICES, &mWithIndices, PluginFieldType::kINT32, 1);
    mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
    mSerializedCollection.fields = mSerializedFields.data();
    return &mSerializedCollection;
}

// ---------------------------------------------------------------------------------------------------------------
// TokenGatherPluginCreator

TokenGatherPluginCreator::TokenGatherPluginCreator() noexcept
{
    mFieldNames[0] = PluginField(kFIELD_KEEP, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames[1] = PluginField(kFIELD_WITH_INDICES, nullptr, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* TokenGatherPluginCreator::getPluginName() const noexcept
{
    return kPLUGIN_NAME;
}

char const* TokenGatherPluginCreator::getPluginVersion() const noexcept
{
    return kPLUGIN_VERSION;
}

char const* TokenGatherPluginCreator::getPluginNamespace() const noexcept
{
    return kPLUGIN_NAMESPACE;
}

PluginFieldCollection const* TokenGatherPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* TokenGatherPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::string const layer = name != nullptr ? name : "<unnamed>";
        int32_t keep = 0;
        int32_t withIndices = 0; // optional field: one output unless asked for
        bool haveKeep = false;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (field.name == nullptr)
            {
                continue;
            }
            if (std::strcmp(field.name, kFIELD_KEEP) == 0)
            {
                if (!readIntField(field, keep))
                {
                    logError(layer + ": attribute K must be one int32 (or int64) value");
                    return nullptr;
                }
                haveKeep = true;
            }
            else if (std::strcmp(field.name, kFIELD_WITH_INDICES) == 0)
            {
                if (!readIntField(field, withIndices))
                {
                    logError(layer + ": attribute with_indices must be one int32 (or int64) value");
                    return nullptr;
                }
            }
        }
        if (!haveKeep || keep < 1)
        {
            logError(layer + ": attribute K (>= 1) is required, got " + (haveKeep ? std::to_string(keep) : "none"));
            return nullptr;
        }
        if (withIndices != 0 && withIndices != 1)
        {
            logError(layer + ": attribute with_indices must be 0 or 1, got " + std::to_string(withIndices));
            return nullptr;
        }
        return new TokenGatherPlugin(keep, withIndices == 1);
    }
    catch (std::exception const& e)
    {
        logError(std::string{"createPlugin failed: "} + e.what());
    }
    catch (...)
    {
        logError("createPlugin failed with an unknown exception");
    }
    return nullptr;
}

} // namespace token_gather

// ---------------------------------------------------------------------------------------------------------------
// Registration (one route per library, see the top of this file)

#if TOKEN_GATHER_DYNAMIC_REGISTRATION

// TENSORRTAPI is empty outside TensorRT's own build, and the library is built with hidden visibility.
#define TOKEN_GATHER_EXPORT __attribute__((visibility("default")))

extern "C" TOKEN_GATHER_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    token_gather::gLoggerFinder.store(finder);
}

extern "C" TOKEN_GATHER_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static token_gather::TokenGatherPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

#else

namespace token_gather
{
REGISTER_TENSORRT_PLUGIN(TokenGatherPluginCreator);
} // namespace token_gather

#endif
